from bdlora.train.main import main

main()
