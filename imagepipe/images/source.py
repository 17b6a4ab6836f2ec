"""Where an image's templates came from: the git commit of the repository holding them."""

from __future__ import annotations

from pathlib import Path


def source_state(folder: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the git repository holding `folder`; (None, False) outside git."""
    import git  # here, not at the top: an up-to-date build never asks

    try:
        repo = git.Repo(folder, search_parent_directories=True)
        commit = repo.head.commit.hexsha
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        return None, False
    relative = folder.resolve().relative_to(Path(repo.working_dir).resolve())
    return commit, repo.is_dirty(untracked_files=True, path=str(relative))
