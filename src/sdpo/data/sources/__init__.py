"""Raw data sources: where their files live (fetch) and how they become records."""
