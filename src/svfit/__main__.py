"""`python -m svfit ...`, which is also what `accelerate launch -m svfit train ...` and `torchrun -m svfit` run."""

from .cli import main

if __name__ == "__main__":
    main()
