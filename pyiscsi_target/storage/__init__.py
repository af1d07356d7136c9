"""Storage backends: byte-addressed images. Know no SCSI."""
