# Two images from one file:
#   docker build -t your-user/phone-bot:0.1.0 .                 Pipecat Cloud's bot (default)
#   docker build --target server -t phonebot-server:0.1.0 .   the self-hosted server.py
#                                                              (docker-compose.yml, deploy/k8s)

# --- server: webhooks, media streams and the bots, `python server.py` (docs/scaling.md) ---
FROM python:3.11-slim AS server

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOST=0.0.0.0 PORT=8000
# glibc gives every thread that allocates its own heap arena, and a long-running server's
# thread pools (Smart Turn, offline STT hand-off, SQLAlchemy) grow late: RSS rose in ~20 MB
# steps under load in the soak benchmark, and stayed flat (~14 MB lower) with two arenas.
ENV MALLOC_ARENA_MAX=2
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY server.py bot.py dialout.py ./
COPY phonebot ./phonebot
COPY agents ./agents
# Not root: the server needs no privileges. /app is its own so the default SQLite records
# file works in a lone container; with several replicas set DATABASE_URL to PostgreSQL.
RUN useradd --create-home --uid 10001 phonebot && chown phonebot /app
USER phonebot
EXPOSE 8000
# /health answers 503 while draining or when Redis is unreachable: no new calls here.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]
# SIGTERM drains calls (phonebot/web/shutdown.py); WORKERS=N runs N processes (phonebot/web/workers.py).
STOPSIGNAL SIGTERM
CMD ["python", "server.py"]

# --- Pipecat Cloud image (the last stage: what a plain `docker build .` makes) ---
# The base image runs `bot(runner_args)` from /app/bot.py.
FROM dailyco/pipecat-base:latest AS pipecat-cloud

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY bot.py dialout.py ./
COPY phonebot ./phonebot
COPY agents ./agents
