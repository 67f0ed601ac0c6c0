"""Programs for tenant-isolation tests and benches: a trivial victim and the neighbours an LLM's ordinary
mistakes make (a loop that swallows its timer, a spinning finaliser hung on its input, megabyte outputs)."""

VICTIM = "def run(input):\n    return input['n'] * 2\n"
# Swallows its own timer: only the worker's watchdog ends it.
SPIN = """
def run(input):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
"""
# Even inputs carry a generator whose finaliser spins once the input is freed, after run has returned.
FINALISER = """
def _hold(spin):
    try:
        yield 1
    finally:
        while spin:
            pass


def run(input):
    held = _hold(input["n"] % 2 == 0)
    next(held)
    input["held"] = held
    return input["n"]
"""
HUGE = "def run(input):\n    return 'x' * 999_000\n"
