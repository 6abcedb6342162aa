"""The training stage: the SFT recipe and the modules it is built from."""
