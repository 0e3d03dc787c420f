# Pipecat Cloud image: the base image runs `bot(runner_args)` from /app/bot.py.
FROM dailyco/pipecat-base:latest

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY bot.py dialout.py ./
COPY phonebot ./phonebot
