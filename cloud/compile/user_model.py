def validate_user_model(*a, **k):
    raise NotImplementedError
