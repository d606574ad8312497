"""Graph rewrite passes, one per module. Import the pass you need from its module."""
