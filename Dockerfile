# One image for the worker, the HTTP gateway (`tuwen gateway serve`), Flower (`tuwen flower`) and the
# producer-side CLI. Build: docker compose build
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY storage ./storage
COPY workers ./workers
COPY tuwen ./tuwen
RUN pip install "torch==2.14.1" "torchvision==0.29.1" && pip install ".[worker,gateway,flower]"

RUN useradd --create-home --uid 1000 tuwen
USER tuwen
ENTRYPOINT ["tuwen"]
CMD ["worker"]
