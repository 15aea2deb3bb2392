from train.distributed import exit_without_teardown
from train.loop import main

if __name__ == "__main__":
    exit_without_teardown(main())
