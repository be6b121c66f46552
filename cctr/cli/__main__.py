from cctr.cli import main

main()
