"""ainode: a DICOM node that runs a lung-CT CNN on received studies and sends back an SR."""

__version__ = "0.1.0"
