"""`polytrain bench`: measured training throughput, FLOP/s, MFU and memory, comparable across backends."""
