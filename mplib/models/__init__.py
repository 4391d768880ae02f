"""The course's models, each readable top to bottom, each a list of blocks whose chain is its forward."""
