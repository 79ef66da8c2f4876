"""Exceptions raised by coinfer's model tooling."""


class ModelError(Exception):
    """Root of every error raised by ``models``."""


class ModelLoadError(ModelError):
    """A model file is missing, unreadable or not a valid ONNX model."""


class BundleError(ModelError):
    """A model bundle is missing a file, fails its hash check or has a bad manifest."""


class CutError(ModelError):
    """A cut is unknown or does not separate the graph into a head and a tail."""


class UnknownTensorError(CutError):
    """A cut or segment names a tensor the model does not have."""


class DatasetError(ModelError):
    """A data set file is missing or malformed."""
