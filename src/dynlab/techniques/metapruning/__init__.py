"""MetaPruning: a PruningNet that generates weights for any channel configuration, searched by
evolution and retrained."""
