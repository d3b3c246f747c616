"""Entry point kept for the upstream command line `torchrun ... ddp_analyze.py ...`: the same driver as
`analyze.py` (which itself runs under torchrun), so the two cannot drift."""

import analyze

if __name__ == "__main__":
    analyze.main()
