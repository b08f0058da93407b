"""python -m nf4lora: the command line (nf4lora.cli)."""
from nf4lora.cli import main

if __name__ == "__main__":
    main()
