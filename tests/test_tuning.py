from pyiscsi_target.tuning import tune_malloc


def test_glibc_takes_the_malloc_thresholds():
    # These machines run glibc: mallopt must accept both settings.
    assert tune_malloc() is True
