"""pyiscsi-target: a pure-Python iSCSI target server.

Three layers, one direction of knowledge (see ARCHITECTURE in the README):
``iscsi`` (the fabric: PDUs, login, sessions) knows no files, ``scsi`` (the
SCSI core: CDB dispatch, sense, unit attentions) knows no iSCSI, ``storage``
(backends) knows no SCSI.
"""

__version__ = "0.1.0"
