"""What every training stage shares (torch-free modules first: the launcher imports them to check a
run before anything runs). Stage packages import engine; engine imports no stage."""
