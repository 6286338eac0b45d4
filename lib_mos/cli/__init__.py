"""Command line (`python -m lib_mos`): every command (`main`), `train` (`train`) and `demo`."""
