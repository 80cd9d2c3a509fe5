"""Database models, types and engine construction shared by both servers."""
