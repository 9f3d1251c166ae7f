from ia3tools.cli import main

main()
