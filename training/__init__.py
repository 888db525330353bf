"""Training of the lung-CT CNN (TensorFlow) and its ONNX export; see docs/model.md.

Modules, in the order data flows: config, data (source interface, DICOM folder + labels.csv,
split, slice arrays), lidc (LIDC-IDRI via pylidc), synthetic
(the semi-synthetic set), models, train, metrics, detection (FROC from score maps), export, evaluate;
bench measures costs.
"""
