"""Virtual experts: computations handed to real tools while the model generates."""
