from dasknmf.cli import main

main()
