"""Device runtimes and the simulated fleet. Not built yet."""
