"""The SCSI core (SPC-4, SBC-3): CDB dispatch, sense, unit attentions, task sets. Knows no iSCSI."""
