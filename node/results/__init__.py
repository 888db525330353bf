"""The result objects: one shared description of the result (:mod:`.facts`) and the DICOM objects built from it.

- :mod:`.sr`: the TID 1500 Structured Report (findings drawn by viewers),
- :mod:`.sc`: the summary image (Secondary Capture) for PACS that show no SR,
- :mod:`.ko`: the Key Object Selection that flags the key images.

Importing this package loads no highdicom; its modules do.
"""
