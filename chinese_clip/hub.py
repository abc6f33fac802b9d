"""Publishing a model directory on the Hugging Face Hub."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token

LOGIN_HINT = "log in with `huggingface-cli login` (or `hf auth login`), set HF_TOKEN, or pass --token"


def hub_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else the one a login saved; checked before any work, so that an export is
    not done for an upload that cannot happen."""
    token = token or get_token()
    if not token:
        raise ValueError(f"pushing to the Hugging Face Hub needs a token: {LOGIN_HINT}")
    return token


def push_to_hub(directory: str | Path, repo_id: str, token: str, private: bool = False) -> str:
    """Upload every file of `directory` to the model repository `repo_id` (created if it does not exist;
    `private` applies only then). Returns the repository's URL."""
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(directory),
                          commit_message=f"Upload {Path(directory).name} (chinese_clip export)")
    except OSError as e:  # the Hub's refusals (HfHubHTTPError: a bad token, no write access) and disk errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"upload of {directory} to {repo_id} failed ({reason}); the export itself is complete") from None
    return str(url)
