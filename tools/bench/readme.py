"""readme placeholder."""
def add_args(ap):
    pass


def main(a):
    return 0
