"""The method of the paper as pure functions of records, models and their own settings: no paths inside."""
