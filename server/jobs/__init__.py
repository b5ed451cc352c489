"""The RunPod-style job system: a persistent store and the queue that runs jobs from it
(`store`, `manager`, `webhooks`), and what a job does: its input validated and decoded once
(`input`), the TTS or agent turn in the conversation's voice (`turn`), RunPod-shaped items
(`output`), and the handler joining them (`handler`)."""
from server.jobs.manager import JobManager, NotRetryable, QueueFull, status_body
from server.jobs.store import (CANCELLED, COMPLETED, FAILED, FINAL_STATES, IN_PROGRESS, IN_QUEUE, TIMED_OUT,
                               JobRow, JobStore)

__all__ = ["CANCELLED", "COMPLETED", "FAILED", "FINAL_STATES", "IN_PROGRESS", "IN_QUEUE", "TIMED_OUT",
           "JobManager", "JobRow", "JobStore", "NotRetryable", "QueueFull", "status_body"]
