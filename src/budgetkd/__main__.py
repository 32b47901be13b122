"""``python -m budgetkd`` and ``torchrun -m budgetkd`` enter the CLI here."""

from budgetkd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
