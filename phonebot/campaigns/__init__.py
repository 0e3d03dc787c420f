"""Outbound campaigns: call a list within its hours, exactly once per attempt, retry by
outcome, honour the do-not-call list (see docs/campaigns.md).

The campaign tables live on the call records' metadata, and the records' writer uses the
do-not-call table: the records package is loaded first, whichever module is imported
first, so neither half ever sees the other half-initialised.
"""

import phonebot.records  # noqa: F401  (import order, see above)
