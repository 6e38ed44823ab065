"""fedplug: federated object detection over Socket.IO, with pluggy plugins and Hydra configs."""
__version__ = "0.1.0"
