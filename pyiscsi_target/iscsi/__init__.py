"""The iSCSI fabric (RFC 7143): PDUs, login, sessions, R2T/Data-In. Knows no files."""
