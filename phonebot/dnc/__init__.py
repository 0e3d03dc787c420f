"""The do-not-call list: its table and store (`store`), the check every dial makes first
(`check`: campaigns, `/dialout`) and its API (`api`); the bot's opt-out writes to it too.
"""
