"""Readers and writers of other dataset formats (robomimic HDF5, LeRobot v3.0, Diffusion Policy zarr 2)."""
