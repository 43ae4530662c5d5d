"""robolearn: chunk policies learned from demonstrations, fine-tuned with RL and accelerated, in MuJoCo."""
__version__ = "0.1.0"
