"""What a person looks at: the figures of top_influences.py and the static HTML explorer (its pages, its
thumbnails, and the CSS and JavaScript in assets/)."""
