from sds.cli import main

main()
