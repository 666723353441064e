"""The one base class of every error a user's input causes (config, data, checkpoint, export).

Each entrypoint catches UserError once, prints its message, which names the key, file or column
at fault, and exits with BAD_INPUT; anything else is a defect of ours and keeps its traceback.
"""

BAD_INPUT = 2  # exit code for a config, data or checkpoint error


class UserError(Exception):
    """Input that cannot work, said in one sentence that names where it is and what was expected.
    `rank_specific`: met in this rank's share of the work only (a bad row in its row groups), so
    other ranks may not have met it, unlike checks every rank makes alike."""

    rank_specific = False
