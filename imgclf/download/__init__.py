"""The download stage: fetch the dataset archive (a URL or a local path), checked by md5."""
