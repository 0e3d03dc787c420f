"""`python -m phonebot.call`: call your bot from a terminal, like Twilio would.

The caller is the emulator's (`phonebot.emulator.client`); see docs/emulator.md.
"""

import sys

from phonebot.emulator.client import main

if __name__ == "__main__":
    sys.exit(main())
