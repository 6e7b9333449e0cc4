"""The one error rule of showtell: who made the mistake decides what is raised.

- A user's mistake (a bad config key or flag, a missing or corrupt input, an environment that
  cannot do the job) raises `ShowtellError` or a subclass, with a message that says what and
  where. The CLI prints it as one line and exits 2:

      $ showtell caption --checkpoint final --beam-size 0 photo.jpg
      showtell caption: error: --beam-size (eval.beam_size): Input should be greater than 0 (got 0)

- A programming error (a caller breaking a function's contract, a state that cannot happen)
  raises anything else, usually ValueError or TypeError, and keeps its traceback: it is a bug
  to fix, not a message for the user.

- Anything but a ShowtellError that stops a command (a programming error, a crashed worker, a
  node lost for good) exits 1. `showtell run` and the step subcommands print it as one line
  naming the step's log, which holds the traceback (`orchestration.step_log.logged_step`).

The exit codes, as the README's "Exit codes" lists them: 0 done (a promotion the gate held back
included: the run did its job, and `promote.json` says why), 2 a user's mistake, 1 anything else.

User input is checked once, where it enters, and trusted after that: config keys by the config
model (schemas/config.py, whose errors are `ConfigError`s naming the dotted key), and CLI flags
that mirror a config key by that same model (e.g. `showtell caption --beam-size` is checked as
`eval.beam_size`). argparse only parses types, and checks limits only for flags that mirror no
key (`showtell run --wait`). Code further in (beam search, training, the pipelines) takes its
settings as validated and does not check them again; its own guards catch programming errors.
"""


USER_MISTAKE = 2  # the exit code of a ShowtellError
OTHER_FAILURE = 1  # the exit code of anything else


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message, or its type's name when it has none."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class ShowtellError(Exception):
    """A bad input, config or environment, with a message that says what and where."""

    exit_code = USER_MISTAKE
