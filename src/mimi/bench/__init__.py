"""The benchmark runner: a grid of runs (spec), each run written as one JSON (runner), claimed by one worker (claims)."""
