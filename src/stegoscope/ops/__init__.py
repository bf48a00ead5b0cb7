"""Pure math: arrays in, arrays out; no I/O, no globals."""
