from tieremu.cli import main

main()
